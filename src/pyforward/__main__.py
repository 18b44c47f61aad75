from pyforward.cli import main

raise SystemExit(main())
