from slotgen.cli import main

main()
