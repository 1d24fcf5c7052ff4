"""PostgreSQL storage: typed ORM tables, session factory and Alembic migrations.

Never imported by workflow code: workflows stay deterministic and reach the database
only through activities.
"""
