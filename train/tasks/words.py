"""Fixed word lists the task generators draw from (short, common words: mostly one token each)."""

from __future__ import annotations

NAMES = (
    "Anna Ben Carl Dana Emma Finn Gina Hugo Iris Jack Kate Leo Mia Nick Olga Paul Rosa Sam Tina Umar Vera Will "
    "Yara Zoe Adam Bella Chris Dora Eric Fiona Greg Hana Ivan Julia Karl Lena Max Nora Omar Pia Ray Sara Tom Uma "
    "Vic Wendy Alex Beth Cole Diana Eli Faye Gus Helen Igor Jane Kim Lily Mark Nina"
).split()

CITIES = (
    "Oslo Paris Rome Berlin Madrid Vienna Prague Dublin Lisbon Athens Warsaw Zurich Boston Denver Austin Dallas "
    "Seattle Chicago Miami Toronto Sydney Tokyo Cairo Lima"
).split()

JOBS = (
    "baker teacher doctor farmer pilot nurse lawyer painter singer driver chef writer dentist builder tailor plumber"
).split()

COLORS = "red blue green yellow black white orange purple brown pink".split()

ANIMALS = "cat dog rabbit horse parrot hamster turtle goat".split()

INSTRUMENTS = "piano violin guitar drums flute cello trumpet harp".split()

PRODUCTS = (
    "fresh bread",
    "wooden toys",
    "solar panels",
    "green tea",
    "running shoes",
    "paper maps",
    "garden tools",
    "wool hats",
    "glass bottles",
    "red wine",
    "video games",
    "silver rings",
    "cheap phones",
    "warm blankets",
    "fishing boats",
    "school books",
    "olive oil",
    "steel pipes",
)

COMPANY_FIRST = "Blue Red Green Silver Golden North South East West Bright Happy Quiet Royal Swift".split()
COMPANY_SECOND = "River Hill Stone Lake Star Moon Oak Pine Bridge Field Cloud Tower".split()
COMPANY_THIRD = "Foods Works Group Labs Trading Systems Goods Partners".split()

FRUITS = "apples pears oranges plums lemons peaches cookies candies pencils stickers marbles cards".split()

PET_NAMES = (
    "Rex Bella Milo Luna Max Coco Teddy Daisy Rocky Lucy Oscar Ruby Leo Rosie Toby Lola Charlie Molly Buster "
    "Ginger Pepper Shadow Simba Nala Ziggy Biscuit Mocha Pickles Waffles Noodle"
).split()
