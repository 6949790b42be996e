"""Optional integrations with other training frameworks (extras: `[st]`)."""
