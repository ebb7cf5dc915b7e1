from ehrmotor.cli import main

raise SystemExit(main())
