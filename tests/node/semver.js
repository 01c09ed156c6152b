// Prints, for each [version, range] pair in the JSON file given, whether npm's
// semver (pinned in package.json) says the version satisfies the range.
'use strict';
const fs = require('fs');
const semver = require('semver');

const cases = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const answers = cases.map(([version, range]) => {
  try {
    return semver.satisfies(version, range);
  } catch (e) {
    return false;
  }
});
console.log(JSON.stringify(answers));
