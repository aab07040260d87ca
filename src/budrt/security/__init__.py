"""budrt.security"""
