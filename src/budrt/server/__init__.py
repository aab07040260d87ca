"""budrt.server"""
