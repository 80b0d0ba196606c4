"""One module per ``ckpt`` command: options in, a report or result out.  No printing, no exit codes here:
``cli.py`` renders, and errors are ``ckpttools.errors`` exceptions caught once in ``cli.py``."""
