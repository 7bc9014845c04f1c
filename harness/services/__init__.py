"""Local brokers (RabbitMQ, Redis, PostgreSQL) started as child processes."""
