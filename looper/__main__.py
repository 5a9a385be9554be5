from looper.cli import main

raise SystemExit(main())
