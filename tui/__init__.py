"""The Textual dashboard (`helexa tui`)."""
