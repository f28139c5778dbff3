from .cli.entry import process_main

process_main()
