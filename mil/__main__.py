from mil.cli import main

raise SystemExit(main())
