"""`python -m rn50.recipe [--preset NAME[,NAME]] [--field value ...]`: print the resolved recipe as TOML, without
training (the presets in rn50/presets/ layered left to right, then the flags)."""

from rn50.config.cli import main

if __name__ == "__main__":
    main()
