"""``python -m ctxd.ctxctl``: the same as ``ctxctl``."""

from ctxd.ctxctl.main import main

if __name__ == "__main__":
    main()
