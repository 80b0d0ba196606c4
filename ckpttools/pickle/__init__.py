"""Reading pickles without running them: ``scan`` (what a pickle names and how it uses it), ``policy`` (the one
safety decision), ``unpickler`` (an unpickler that builds inert descriptions)."""
