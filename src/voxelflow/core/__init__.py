"""What every layer uses: storage, the database and its migrations, the audit log, redaction, the retry classifier."""
