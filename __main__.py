from selfflow.cli import main

raise SystemExit(main())
