from train_cli.main import main

raise SystemExit(main())
