"""Domain operations shared by the CLI, the webhook app and the activities."""
