from cubefs.cli import main

raise SystemExit(main())
