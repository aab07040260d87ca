"""budrt.control"""
