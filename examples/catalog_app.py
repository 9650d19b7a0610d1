#!/usr/bin/env python3
"""The book catalog app, reading through cachetail: not a single cacheDelete call.

The app writes to its SQLite database as it always did (plain sqlite3, its own transactions),
and reads its cached values from cachetail's endpoint. cachetail's triggers see every write, and
the daemon keeps `book:{id}`, `book:{id}:reviews` and `top-books` fresh by itself.

Standard library only. With the daemon running on the reference config (`config.toml`):

    python3 examples/catalog_app.py --db catalog.db --url http://127.0.0.1:8080 show 1
    python3 examples/catalog_app.py --db catalog.db --url http://127.0.0.1:8080 review 1 5 "Great"
    python3 examples/catalog_app.py --db catalog.db --url http://127.0.0.1:8080 tour

`tour` posts, edits and deletes a review and shows, after each write, what the app reads: the
book's page changes at once, with nothing invalidated by the app.
"""

import argparse
import json
import sqlite3
import sys
import urllib.error
import urllib.parse
import urllib.request


class Catalog:
    def __init__(self, db, url):
        # A plain connection, as any app has: a normal busy timeout, nothing cachetail-specific.
        self.con = sqlite3.connect(db, timeout=5)
        self.url = url.rstrip("/")

    # --- writes: the app's own SQL, in its own transactions. No cache calls anywhere.

    def post_review(self, book_id, user_id, rating, body=""):
        with self.con:
            cur = self.con.execute(
                "INSERT INTO reviews (book_id, user_id, rating, body) VALUES (?, ?, ?, ?)",
                (book_id, user_id, rating, body),
            )
            return cur.lastrowid

    def edit_review(self, review_id, rating):
        with self.con:
            self.con.execute("UPDATE reviews SET rating = ? WHERE id = ?", (rating, review_id))

    def delete_review(self, review_id):
        with self.con:
            self.con.execute("DELETE FROM reviews WHERE id = ?", (review_id,))

    # --- reads: through cachetail.

    def cached(self, key, fresh=False):
        """The value cachetail serves for `key` (None for a 404). `fresh=True` waits until the
        daemon has applied this app's own writes (read-your-writes)."""
        path = "/v1/keys/" + urllib.parse.quote(key, safe="")
        if fresh:
            path += "?fresh=1"
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as reply:
                return json.load(reply)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def book_page(self, book_id, fresh=False):
        return {
            "book": self.cached(f"book:{book_id}", fresh),
            "reviews": self.cached(f"book:{book_id}:reviews", fresh),
        }

    def top_books(self, fresh=False):
        return self.cached("top-books", fresh)


def tour(app, book_id):
    """Writes, and after each write reads what a user would see. Exits non-zero if any read
    did not reflect the write just made."""
    def show(what):
        page = app.book_page(book_id, fresh=True)
        book = page["book"]
        print(f"{what:<28} book:{book_id} reviews={book['review_count']} "
              f"avg={book['avg_rating']} latest={[r['rating'] for r in page['reviews'][:3]]}")
        return book

    before = show("before")
    review = app.post_review(book_id, 1, 5, "Loved it")
    after = show("posted a 5-star review")
    assert after["review_count"] == before["review_count"] + 1, (before, after)
    app.edit_review(review, 1)
    edited = app.book_page(book_id, fresh=True)["reviews"][0]
    show("edited it to 1 star")
    assert edited["id"] == review and edited["rating"] == 1, edited
    app.delete_review(review)
    gone = show("deleted it")
    assert gone["review_count"] == before["review_count"], (before, gone)
    top = app.top_books(fresh=True)
    print(f"{'top books':<28} {[(b['id'], b['avg_rating']) for b in top]}")
    print("every read reflected the write before it; the app invalidated nothing")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="the app's SQLite file")
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="cachetail's endpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a book's page as the app reads it")
    show.add_argument("book_id", type=int)
    review = sub.add_parser("review", help="post a review")
    review.add_argument("book_id", type=int)
    review.add_argument("rating", type=int)
    review.add_argument("body", nargs="?", default="")
    review.add_argument("--user", type=int, default=1)
    tour_cmd = sub.add_parser("tour", help="write, read, and check each read is fresh")
    tour_cmd.add_argument("book_id", type=int, nargs="?", default=1)
    args = parser.parse_args()
    app = Catalog(args.db, args.url)
    if args.command == "show":
        print(json.dumps(app.book_page(args.book_id), indent=2))
    elif args.command == "review":
        review_id = app.post_review(args.book_id, args.user, args.rating, args.body)
        print(f"review {review_id} posted; the page now reads:")
        print(json.dumps(app.book_page(args.book_id, fresh=True)["book"], indent=2))
    else:
        tour(app, args.book_id)


if __name__ == "__main__":
    sys.exit(main())
