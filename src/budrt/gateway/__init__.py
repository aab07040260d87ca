"""budrt.gateway"""
