"""Sequential compression: capture -> statistics -> factorise -> replace -> propagate."""
