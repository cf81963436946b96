from kidneyscan.cli import main

main()
