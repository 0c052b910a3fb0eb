from musicrec.cli import main

raise SystemExit(main())
