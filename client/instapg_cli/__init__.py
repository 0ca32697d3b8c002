"""`instapg`: get a PostgreSQL database into .env with one command."""

__version__ = "0.1.0"
