"""budrt.image"""
