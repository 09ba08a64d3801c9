from adag.cli import main

main()
