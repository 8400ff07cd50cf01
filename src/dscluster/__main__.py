from dscluster.cli import main

raise SystemExit(main())
