"""Reports: tables, CSV, JSON and plots. No arithmetic beyond formatting lives here."""
