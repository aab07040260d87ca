"""budrt.observe"""
