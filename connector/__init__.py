"""usersync: reverse ETL for user attributes."""

__version__ = "0.1.0"
