"""The OTC bond market services (decision 0070)."""
