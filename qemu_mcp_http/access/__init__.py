"""Who may call and what they did: bearer tokens and their grants."""
