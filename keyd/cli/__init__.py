"""keydctl, the admin command line."""
