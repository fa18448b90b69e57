"""Emulated KHO users: the producers on kho_out's notifier chain."""
