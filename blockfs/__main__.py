from blockfs.cli.main import main

raise SystemExit(main())
