"""budrt.store"""
