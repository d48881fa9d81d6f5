"""Adapters: the only code that runs storage programs (through keyd.runner) or reads /proc."""
