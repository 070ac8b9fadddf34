from blockfs.cli import main

raise SystemExit(main())
