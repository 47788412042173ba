from oistream.cli import main

raise SystemExit(main())
