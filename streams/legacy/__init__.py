"""Legacy back-office integration: the daily export files and the holdings import."""
