"""`python -m budrt.cli`: the same as the `budrt` command."""

from budrt.cli import main

main()
