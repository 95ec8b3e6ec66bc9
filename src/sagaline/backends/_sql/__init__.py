"""What the database backends share, whatever their SQL dialect: constants, envelopes, saga
records and JSON as they are stored in rows (:mod:`.rows`), and the planning of claims and
settlements (:mod:`.planner`), so that each backend keeps only its SQL and its I/O. No driver is
imported here."""
