-- The book catalog used by the demo, the reference config and the tests: an ordinary app schema.
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS books (
    id     INTEGER PRIMARY KEY,
    title  TEXT NOT NULL,
    author TEXT NOT NULL,
    year   INTEGER
);
CREATE TABLE IF NOT EXISTS users (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reviews (
    id      INTEGER PRIMARY KEY,
    book_id INTEGER NOT NULL REFERENCES books (id) ON DELETE CASCADE,
    user_id INTEGER NOT NULL REFERENCES users (id),
    rating  INTEGER NOT NULL CHECK (rating BETWEEN 1 AND 5),
    body    TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS reviews_by_book ON reviews (book_id, rating);
CREATE INDEX IF NOT EXISTS reviews_by_user ON reviews (user_id);
