from instructlm.cli import main

raise SystemExit(main())
