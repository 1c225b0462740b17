"""`python -m rn50.config [--preset NAME[,NAME]] [--field value ...]`: print the resolved recipe as TOML."""

from rn50.config.cli import main

main()
