from slapcli.cli import main

main()
