from budrt.server.main import main

main()
