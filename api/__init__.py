"""The REST service and search page: thin, calls the service facade."""
