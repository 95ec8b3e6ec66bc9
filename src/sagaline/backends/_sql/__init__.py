"""What the database backends share, whatever their SQL dialect: constants, and envelopes,
saga records and JSON as they are stored in rows. No driver is imported here."""
