"""The results folder: its contract, what is collected into it, the accounting."""
